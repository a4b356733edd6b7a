"""A synthetic product catalogue in the official Rakuten challenge layout, for tests and demos.

The generated ZIP looks like the real one (``X_train_update.csv``, ``Y_train_CVw08PX.csv`` and
``images/image_train/image_{imageid}_product_{productid}.jpg``) so every pipeline stage can run end to
end without the 2 GB download. Class sizes follow the official imbalance; the text and the images carry
class signal, blurred by shared words, words borrowed from other classes and images drawn in another
class's style, so models learn something without scoring 100 %.

Everything is a pure function of the :class:`SampleSpec`: one seed gives byte-identical ZIPs.
"""

from __future__ import annotations

import colorsys
import io
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from lib.data.rakuten import (
    OFFICIAL_CLASS_COUNTS,
    X_COLUMNS,
    X_FILE,
    X_TEST_FILE,
    Y_COLUMNS,
    Y_FILE,
    image_member_name,
)

# --- generator constants (part of the sample's definition, not pipeline configuration) ------------

# A fixed timestamp and fixed attributes make the ZIP bytes depend on the content only.
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
ZIP_UNIX_FILE_MODE = 0o644 << 16
ZIP_CREATE_SYSTEM_UNIX = 3  # ZipInfo defaults to 0 on Windows: pin it so bytes match across OSes
# At 500 px (the challenge's size) this gives ~27 kB per image, like the real ones (q85: 48 kB).
JPEG_QUALITY = 72

# Offsets that give realistic id sizes: 9-digit productids, 10-digit imageids.
PRODUCTID_RANGE = (100_000_000, 999_999_999)
IMAGEID_RANGE = (1_000_000_000, 1_999_999_999)

# Share of words drawn from each source (the rest comes from the shared vocabulary).
P_CLASS_WORD = 0.30
P_NOISE_WORD = 0.12  # from one other class per product: makes classes overlap
P_CODE_WORD = 0.10  # reference codes, sizes and pseudo-brands: high-entropy, class-neutral
# Share of products whose text borrows mostly from another class (mislisted products exist in real data).
P_MISLEADING_TEXT = 0.06

DESIGNATION_WORDS = (4, 12)
DESCRIPTION_SENTENCES = (1, 4)
SENTENCE_WORDS = (5, 13)

# Class-specific words; several lists overlap on purpose (books, video games) like the real classes.
CLASS_VOCABULARY: dict[int, tuple[str, ...]] = {
    10: ("roman", "édition", "poche", "auteur", "occasion", "livre", "chapitre", "tome", "préface",
         "broché", "bon état", "Folio", "Gallimard", "récit", "jaunies"),
    40: ("jeu", "PS4", "Xbox-360", "Nintendo", "Wii", "PS3", "PAL", "version française", "boîtier",
         "DS", "import", "CD", "GameCube", "notice", "blu-ray"),
    50: ("manette", "câble", "chargeur", "support", "casque", "adaptateur", "housse", "protection",
         "USB", "sans fil", "batterie", "Switch", "stick", "joy-con"),
    60: ("console", "PlayStation", "Game Boy", "portable", "rétro", "Mega Drive", "Super Nintendo",
         "pack", "alimentation", "coque", "mini", "Atari", "NES"),
    1140: ("figurine", "Funko", "Pop", "Marvel", "Star Wars", "Dragon Ball", "manga", "vinyle",
           "collector", "personnage", "statuette", "anime", "Naruto", "One Piece"),
    1160: ("carte", "Pokémon", "Yu-Gi-Oh", "Magic", "booster", "holo", "rare", "deck", "PV", "VF",
           "Panini", "vignette", "foil", "série"),
    1180: ("Warhammer", "figurine", "peinture", "socle", "escouade", "jeu de rôle", "dés",
           "Games Workshop", "résine", "plomb", "armée", "miniature", "D&D"),
    1280: ("peluche", "doudou", "jouet", "poupée", "enfant", "ourson", "Playmobil", "voiture",
           "Disney", "lapin", "musical", "Barbie", "douce"),
    1281: ("jeu de société", "plateau", "joueurs", "cartes", "Monopoly", "puzzle", "pièces", "règles",
           "famille", "stratégie", "ans", "Asmodee", "extension"),
    1300: ("maquette", "1/43", "1/18", "modèle réduit", "échelle", "drone", "hélicoptère",
           "radiocommandé", "moteur", "locomotive", "HO", "avion", "Revell", "miniature"),
    1301: ("chaussettes", "bébé", "naissance", "bavoir", "body", "fléchettes", "billard", "baby-foot",
           "cible", "mois", "coton", "queue de billard"),
    1302: ("trampoline", "balançoire", "toboggan", "pêche", "leurre", "cerf-volant", "plein air",
           "portique", "ballon", "jardin", "trottinette", "moulinet"),
    1320: ("poussette", "siège auto", "biberon", "tétine", "lit parapluie", "sac à langer",
           "chancelière", "gigoteuse", "matelas", "bébé", "nacelle", "chauffe-biberon"),
    1560: ("canapé", "table", "chaise", "armoire", "commode", "étagère", "bois", "tiroir", "meuble",
           "salon", "chêne", "matelas", "bureau", "tabouret"),
    1920: ("housse de couette", "oreiller", "coussin", "taie", "drap", "plaid", "rideau", "coton",
           "parure", "lit", "polyester", "240x220", "nappe"),
    1940: ("café", "chocolat", "bio", "thé", "sachet", "capsules", "bonbons", "épices", "sucre",
           "biscuits", "miel", "arôme", "Nespresso", "500 g"),
    2060: ("décoration", "lampe", "miroir", "cadre", "vase", "guirlande", "sticker", "LED", "mural",
           "bougie", "horloge", "déco", "lumineux", "Noël"),
    2220: ("chien", "chat", "collier", "laisse", "croquettes", "aquarium", "niche", "arbre à chat",
           "griffoir", "gamelle", "harnais", "animal", "litière"),
    2280: ("magazine", "journal", "revue", "numéro", "1975", "Paris Match", "ancien", "hebdomadaire",
           "mensuel", "presse", "n°", "Le Monde", "illustré"),
    2403: ("BD", "album", "lot", "bande dessinée", "Astérix", "Tintin", "tome", "livre", "collection",
           "manga", "Spirou", "revues", "partition"),
    2462: ("lot", "jeux", "console", "PS2", "Xbox", "manettes", "DS", "Wii", "occasion", "complet",
           "Game Boy", "cartouches", "pack"),
    2522: ("cahier", "stylo", "carnet", "agenda", "feutre", "crayon", "classeur", "papier", "A4", "A5",
           "enveloppe", "trousse", "bloc-notes", "encre"),
    2582: ("salon de jardin", "parasol", "transat", "hamac", "tonnelle", "bain de soleil",
           "résine tressée", "pergola", "terrasse", "extérieur", "aluminium", "fauteuil", "banc"),
    2583: ("piscine", "filtre", "pompe", "spa", "chlore", "bâche", "hors sol", "robot", "skimmer",
           "liner", "gonflable", "Intex", "Bestway", "sable", "échelle"),
    2585: ("outil", "perceuse", "tondeuse", "tuyau", "arrosage", "scie", "débroussailleuse",
           "sécateur", "tournevis", "Bosch", "Makita", "visseuse", "brouette", "jardinage"),
    2705: ("livre", "roman", "auteur", "édition", "poche", "broché", "histoire", "essai", "biographie",
           "récit", "pages", "éditeur", "ISBN", "relié"),
    2905: ("PC", "Steam", "téléchargement", "code", "clé", "Windows", "DLC", "jeu", "édition",
           "numérique", "Mac", "activation", "Ubisoft", "Origin"),
}  # fmt: skip

SHARED_VOCABULARY: tuple[str, ...] = (
    "lot", "neuf", "qualité", "couleur", "taille", "cm", "livraison rapide", "noir", "blanc", "rouge",
    "bleu", "vert", "grand", "petit", "original", "nouveau", "haute qualité", "pour", "avec", "de", "et",
    "la", "le", "les", "en", "très bon état", "prix", "cadeau", "idéal", "offre", "modèle", "pièce",
    "accessoire", "marque", "authentique", "garantie", "promo", "2 en 1", "d'origine", "l'article",
    "jusqu'à", "simple", "pratique", "léger", "solide", "moderne", "vintage", "France", "livré",
)  # fmt: skip

PSEUDO_BRANDS: tuple[str, ...] = (
    "Kinoa", "Lumio", "Marvix", "Generic", "Sodial", "Zentra", "Novaline", "Orkys", "Belmont", "Tivoli",
)  # fmt: skip

SENTENCE_OPENERS: tuple[str, ...] = (
    "Vendu", "Article", "Produit", "Idéal pour", "Parfait pour", "Livré avec", "Convient pour",
    "Matière :", "Dimensions :", "Description :", "Caractéristiques :", "Ce produit",
)  # fmt: skip

# HTML entities the real descriptions carry; "&" first so later entities are not escaped twice.
HTML_ENTITIES: tuple[tuple[str, str], ...] = (
    ("&", "&amp;"), ("é", "&eacute;"), ("è", "&egrave;"), ("à", "&agrave;"), ("'", "&#39;"),
)  # fmt: skip

SHAPES: tuple[str, ...] = ("circle", "rectangle", "stripes", "triangle", "grid", "diamond")
# Three brightness levels × nine hues keeps 27 styles apart in colour, on top of the shape.
STYLE_VALUES: tuple[float, ...] = (0.55, 0.75, 0.95)
STYLE_HUES = 9


@dataclass(frozen=True)
class SampleSpec:
    """What to generate: size, seed and the knobs of the noise."""

    products: int
    seed: int = 0
    image_size: int = 96
    empty_description_rate: float = 0.3
    html_rate: float = 0.2
    label_noise_images: float = 0.25
    top_folder: str | None = None
    with_labels: bool = True

    def __post_init__(self) -> None:
        if self.products < 1:
            raise ValueError(f"products must be >= 1, got {self.products}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy SeedSequence), got {self.seed}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        for name in ("empty_description_rate", "html_rate", "label_noise_images"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")


# --- class sizes -------------------------------------------------------------------------------------


def class_counts(products: int) -> dict[int, int]:
    """Products per prdtypecode, proportional to the official counts (largest remainder).

    Every class gets at least 2 products from 54 products on, and at least 1 from 27 on, so small
    samples still cover all 27 classes; the extra products come from the largest classes.
    """
    codes = sorted(OFFICIAL_CLASS_COUNTS)
    weights = np.array([OFFICIAL_CLASS_COUNTS[c] for c in codes], dtype=np.float64)
    exact = products * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    # Stable sort on the negated remainder: ties go to the lower code, never to dict order.
    leftover = products - int(counts.sum())
    for i in np.argsort(-(exact - counts), kind="stable")[:leftover]:
        counts[i] += 1

    minimum = 2 if products >= 2 * len(codes) else 1 if products >= len(codes) else 0
    for i in range(len(codes)):
        while counts[i] < minimum:
            donor = int(np.argmax(counts))  # first largest: deterministic
            counts[donor] -= 1
            counts[i] += 1
    return {code: int(n) for code, n in zip(codes, counts, strict=True)}


# --- text --------------------------------------------------------------------------------------------


def _code_token(k: int) -> str:
    """A class-neutral reference, size or pseudo-brand derived from one random integer."""
    kind = k % 6
    if kind == 0:
        return f"REF-{k // 6 % 9000 + 1000}"
    if kind == 1:
        return f"{k // 6 % 190 + 10}cm"
    if kind == 2:
        return f"x{k // 6 % 11 + 2}"
    if kind == 3:
        return f"{k // 6 % 90 + 10}x{k // 540 % 90 + 10}"
    return PSEUDO_BRANDS[k // 6 % len(PSEUDO_BRANDS)]


def _words(rng: np.random.Generator, n: int, own: Sequence[str], noise: Sequence[str]) -> list[str]:
    """n words mixing the product's class, one other class, codes and the shared vocabulary."""
    # Two vectorised draws per call instead of one per word: text is the slow part otherwise.
    u = rng.random(n)
    k = rng.integers(0, 1 << 30, n)
    words = []
    for ui, ki in zip(u.tolist(), k.tolist(), strict=True):
        if ui < P_CLASS_WORD:
            words.append(own[ki % len(own)])
        elif ui < P_CLASS_WORD + P_NOISE_WORD:
            words.append(noise[ki % len(noise)])
        elif ui < P_CLASS_WORD + P_NOISE_WORD + P_CODE_WORD:
            words.append(_code_token(ki))
        else:
            words.append(SHARED_VOCABULARY[ki % len(SHARED_VOCABULARY)])
    return words


def _capitalised(words: list[str]) -> str:
    text = " ".join(words)
    return text[:1].upper() + text[1:]


def _to_html(sentences: list[str], rng: np.random.Generator) -> str:
    """Wrap sentences the way marketplace sellers do: tags, line breaks and escaped characters."""
    escaped = []
    for sentence in sentences:
        for char, entity in HTML_ENTITIES:
            sentence = sentence.replace(char, entity)
        words = sentence.split(" ")
        # One bold word and one non-breaking space per sentence so every HTML description has both.
        b = int(rng.integers(0, len(words)))
        words[b] = f"<b>{words[b]}</b>"
        if len(words) > 1:
            j = int(rng.integers(1, len(words)))
            words[j - 1] = f"{words[j - 1]}&nbsp;{words[j]}"
            del words[j]
        escaped.append(" ".join(words))
    return "<p>" + "<br />".join(escaped) + "</p>"


def _product_text(
    rng: np.random.Generator, code: int, codes: Sequence[int], spec: SampleSpec
) -> tuple[str, str]:
    """(designation, description) of one product of class ``code``."""
    others = [c for c in codes if c != code]
    noise_code = others[int(rng.integers(0, len(others)))]
    own, noise = CLASS_VOCABULARY[code], CLASS_VOCABULARY[noise_code]
    if rng.random() < P_MISLEADING_TEXT:
        own, noise = noise, own

    n = int(rng.integers(DESIGNATION_WORDS[0], DESIGNATION_WORDS[1] + 1))
    designation = _capitalised(_words(rng, n, own, noise))

    if rng.random() < spec.empty_description_rate:
        return designation, ""
    sentences = []
    for _ in range(int(rng.integers(DESCRIPTION_SENTENCES[0], DESCRIPTION_SENTENCES[1] + 1))):
        opener = SENTENCE_OPENERS[int(rng.integers(0, len(SENTENCE_OPENERS)))]
        n = int(rng.integers(SENTENCE_WORDS[0], SENTENCE_WORDS[1] + 1))
        sentences.append(_capitalised([opener, *_words(rng, n, own, noise)]) + ".")
    if rng.random() < spec.html_rate:
        return designation, _to_html(sentences, rng)
    return designation, " ".join(sentences)


def _unique_ids(rng: np.random.Generator, n: int, bounds: tuple[int, int]) -> np.ndarray:
    low, high = bounds
    # Without replacement: ids are keys (image names, joins), duplicates would collide.
    return rng.choice(high - low + 1, size=n, replace=False).astype(np.int64) + low


def generate_catalogue(spec: SampleSpec) -> pd.DataFrame:
    """The products of a sample: designation, description, productid, imageid, prdtypecode.

    Rows are shuffled (classes interleaved, as in the official file); empty descriptions are ``""``
    (they read back as NaN from the CSV, like the official data).
    """
    rng = np.random.default_rng([spec.seed, 0])
    counts = class_counts(spec.products)
    codes = sorted(counts)
    labels = np.repeat(np.array(codes, dtype=np.int64), [counts[c] for c in codes])
    labels = labels[rng.permutation(len(labels))]

    texts = [_product_text(rng, int(code), codes, spec) for code in labels.tolist()]
    return pd.DataFrame(
        {
            "designation": [t[0] for t in texts],
            "description": [t[1] for t in texts],
            "productid": _unique_ids(rng, spec.products, PRODUCTID_RANGE),
            "imageid": _unique_ids(rng, spec.products, IMAGEID_RANGE),
            "prdtypecode": labels,
        }
    )


# --- images ------------------------------------------------------------------------------------------


def _style(code: int) -> tuple[float, float, str]:
    """(hue, value, shape) of a class: fixed, so the image signal is stable across samples."""
    i = sorted(OFFICIAL_CLASS_COUNTS).index(code)
    hue = (i % STYLE_HUES) / STYLE_HUES
    value = STYLE_VALUES[i // STYLE_HUES % len(STYLE_VALUES)]
    # Shape cycles on a different period than colour, so shape and colour both carry information.
    return hue, value, SHAPES[(i * 5 + i // STYLE_HUES) % len(SHAPES)]


def render_image(code: int, rng: np.random.Generator, size: int) -> Image.Image:
    """An RGB ``size``×``size`` image in the style of class ``code``: hue, brightness and shape.

    Position, scale, exact colour, background and pixel noise are random, so the style is a tendency
    a model can learn, not a fingerprint.
    """
    hue, value, shape = _style(code)
    # A light, nearly grey background: random enough to vary, not so much that it drowns the colour.
    grey = int(rng.integers(175, 246))
    background = tuple(int(v) for v in np.clip(grey + rng.integers(-12, 13, 3), 0, 255))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)

    h = (hue + rng.uniform(-0.04, 0.04)) % 1.0
    s = rng.uniform(0.5, 0.95)
    v = min(1.0, max(0.0, value + rng.uniform(-0.1, 0.1)))
    colour = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, s, v))

    extent = rng.uniform(0.45, 0.9) * size
    cx, cy = rng.uniform(extent / 2, size - extent / 2, 2)
    box = (cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2)
    width = max(1, int(size / 24))
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "rectangle":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(box[0], box[3]), (cx, box[1]), (box[2], box[3])], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, box[1]), (box[2], cy), (cx, box[3]), (box[0], cy)], fill=colour)
    elif shape == "stripes":
        step = max(2, int(extent / 5))
        for x in range(int(box[0]), int(box[2]), step):
            draw.rectangle((x, box[1], x + step // 2, box[3]), fill=colour)
    else:  # grid
        step = max(3, int(extent / 4))
        for t in range(0, int(extent) + 1, step):
            draw.line((box[0] + t, box[1], box[0] + t, box[3]), fill=colour, width=width)
            draw.line((box[0], box[1] + t, box[2], box[1] + t), fill=colour, width=width)

    # A small distractor in a random colour: real photos have more than one object.
    d = rng.uniform(0.1, 0.2) * size
    dx, dy = rng.uniform(0, size - d, 2)
    draw.ellipse((dx, dy, dx + d, dy + d), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))

    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3), dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


# --- ZIP ---------------------------------------------------------------------------------------------


def _zip_info(name: str, compress_type: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE_TIME)
    info.compress_type = compress_type
    info.external_attr = ZIP_UNIX_FILE_MODE
    info.create_system = ZIP_CREATE_SYSTEM_UNIX
    return info


def _csv_bytes(frame: pd.DataFrame) -> bytes:
    # Default unnamed index first, like the official files; "\n" pinned so bytes match across OSes.
    return frame.to_csv(index=True, lineterminator="\n").encode("utf-8")


def write_sample_zip(spec: SampleSpec, out: str | Path | BinaryIO) -> pd.DataFrame:
    """Write a sample ZIP in the official layout to a path or binary file; return its catalogue.

    The returned catalogue always has ``prdtypecode`` (the ground truth), even when the ZIP has no
    Y file (``with_labels=False``).
    """
    catalogue = generate_catalogue(spec)
    prefix = f"{spec.top_folder.strip('/')}/" if spec.top_folder else ""
    # Images get their own stream so the text stays the same whatever the image settings.
    rng = np.random.default_rng([spec.seed, 1])
    codes = sorted(OFFICIAL_CLASS_COUNTS)

    # Unlabelled: the challenge's test layout (X_test_update.csv, images/image_test/).
    x_file, split = (X_FILE, "train") if spec.with_labels else (X_TEST_FILE, "test")
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr(
            _zip_info(prefix + x_file, zipfile.ZIP_DEFLATED), _csv_bytes(catalogue[list(X_COLUMNS)])
        )
        if spec.with_labels:
            archive.writestr(
                _zip_info(prefix + Y_FILE, zipfile.ZIP_DEFLATED), _csv_bytes(catalogue[list(Y_COLUMNS)])
            )
        rows = zip(
            catalogue["prdtypecode"].tolist(),
            catalogue["imageid"].tolist(),
            catalogue["productid"].tolist(),
            strict=True,
        )
        for code, imageid, productid in rows:
            style = code
            if rng.random() < spec.label_noise_images:
                # Another class's style: images alone must not identify the class.
                style = codes[int(rng.integers(0, len(codes) - 1))]
                style = style if style != code else codes[-1]
            image = render_image(style, rng, spec.image_size)
            archive.writestr(
                _zip_info(prefix + image_member_name(imageid, productid, split), zipfile.ZIP_STORED),
                _jpeg_bytes(image),
            )
    return catalogue


def imbalance_ratio(catalogue: pd.DataFrame) -> float:
    """Largest over smallest class size, among the classes present."""
    sizes = catalogue["prdtypecode"].value_counts()
    return float(sizes.max() / sizes.min())
