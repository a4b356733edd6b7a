"""The Rakuten France challenge format: file names, columns, product-type codes and descriptive names.

The prdtypecode is the key everywhere. There is no official name list; the French names below are
descriptive guesses (close to the consensus of public projects) for display only.
"""

from __future__ import annotations

import re

X_FILE = "X_train_update.csv"
X_TEST_FILE = "X_test_update.csv"  # the challenge's unlabelled products (images under images/image_test/)
Y_FILE = "Y_train_CVw08PX.csv"
X_COLUMNS = ("designation", "description", "productid", "imageid")
Y_COLUMNS = ("prdtypecode",)
IMAGE_NAME_RE = re.compile(r"(?:^|/)image_(\d+)_product_(\d+)\.jpe?g$", re.IGNORECASE)


def image_member_name(imageid: int, productid: int, split: str = "train") -> str:
    """Member path of a product image inside an official-layout ZIP."""
    return f"images/image_{split}/image_{imageid}_product_{productid}.jpg"


# prdtypecode → descriptive French name (display only).
CLASS_NAMES: dict[int, str] = {
    10: "Livres d'occasion",
    40: "Jeux vidéo, CD et accessoires",
    50: "Accessoires gaming",
    60: "Consoles de jeux",
    1140: "Figurines et produits dérivés geek",
    1160: "Cartes à collectionner",
    1180: "Figurines et jeux de rôle",
    1280: "Jouets et peluches",
    1281: "Jeux de société",
    1300: "Modélisme et modèles réduits",
    1301: "Articles bébé et jeux d'intérieur",
    1302: "Jeux d'extérieur et loisirs",
    1320: "Puériculture",
    1560: "Mobilier et décoration d'intérieur",
    1920: "Linge de maison",
    1940: "Épicerie",
    2060: "Décoration",
    2220: "Animalerie",
    2280: "Magazines et journaux anciens",
    2403: "Livres, BD et magazines",
    2462: "Lots de jeux vidéo et consoles",
    2522: "Papeterie",
    2582: "Mobilier et accessoires de jardin",
    2583: "Piscine et spa",
    2585: "Bricolage et outillage de jardin",
    2705: "Livres neufs",
    2905: "Jeux PC en téléchargement",
}

PRDTYPECODES: tuple[int, ...] = tuple(sorted(CLASS_NAMES))

# Class sizes in the full official training set (84,916 products); largest/smallest ≈ 13.4.
OFFICIAL_CLASS_COUNTS: dict[int, int] = {
    10: 3116, 40: 2508, 50: 1681, 60: 832, 1140: 2671, 1160: 3953, 1180: 764, 1280: 4870, 1281: 2070,
    1300: 5045, 1301: 807, 1302: 2491, 1320: 3241, 1560: 5073, 1920: 4303, 1940: 803, 2060: 4993,
    2220: 824, 2280: 4760, 2403: 4774, 2462: 1421, 2522: 4989, 2582: 2589, 2583: 10209, 2585: 2496,
    2705: 2761, 2905: 872,
}  # fmt: skip


def class_name(code: int) -> str:
    """Descriptive name of a prdtypecode (``"code N"`` for an unknown one)."""
    return CLASS_NAMES.get(int(code), f"code {code}")
