from lib.data.text import clean_text, product_text


def test_html_entities_tags_and_whitespace_are_cleaned():
    raw = "<p>Jeu&nbsp;vid&eacute;o <b>Xbox-360</b></p><br />Manette&amp;c&acirc;ble \x92 \n\t PS4"
    assert clean_text(raw) == "Jeu vidéo Xbox-360 Manette&câble PS4"


def test_double_escaped_entities_are_unescaped():
    assert clean_text("caf&amp;eacute; &amp;lt;b&amp;gt;noir&amp;lt;/b&amp;gt;") == "café noir"


def test_codes_and_numbers_that_carry_signal_are_kept():
    text = "Voiture miniature 1/43 Porsche 911 - Xbox-360 - PS4 - 50cm x 30cm - Réf. 4521-B"
    assert clean_text(text) == text


def test_missing_values_become_empty_strings():
    assert clean_text(None) == ""
    assert clean_text(float("nan")) == ""


def test_unicode_is_normalised_to_nfc():
    assert clean_text("e\u0301te\u0301") == "été"


def test_product_text_truncates_the_description_only():
    assert product_text("Titre", "abcdef", 3) == "Titre . abc"
    assert product_text("Titre", "", 3) == "Titre"


def test_a_capped_field_is_cut_before_cleaning_and_after():
    huge = "<b>Console</b> PS4 " * 300_000  # about 5 MB of markup and words
    cleaned = clean_text(huge, 1000)
    assert len(cleaned) == 1000 and cleaned.startswith("Console PS4 Console")
    assert clean_text("court", 1000) == clean_text("court")
