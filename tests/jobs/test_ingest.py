"""Ingestion against real SeaweedFS + Ray: counts, exactly-once, updates, crash safety, bad inputs."""

from __future__ import annotations

import io
import zipfile

import pandas as pd
import pytest
from PIL import Image

from jobs import ingest as ingest_job
from lib.data import lake, layout
from lib.data.images import IMAGE_MISSING, IMAGE_TOO_LARGE, IMAGE_UNREADABLE
from lib.data.ingest import IngestError, ingest_zip
from lib.data.rakuten import image_member_name
from lib.data.sample import SampleSpec, write_sample_zip
from lib.data.storage import exists, list_keys, put_bytes


def upload(s3, settings, data: bytes, name: str) -> str:
    put_bytes(s3, settings.bucket_incoming, name, data)
    return f"s3://{settings.bucket_incoming}/{name}"


def sample_bytes(products: int, seed: int = 0, **kw) -> tuple[bytes, pd.DataFrame]:
    buf = io.BytesIO()
    catalogue = write_sample_zip(SampleSpec(products=products, seed=seed, image_size=48, **kw), buf)
    return buf.getvalue(), catalogue


def jpeg(color=(200, 30, 30), size=(40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "JPEG")
    return out.getvalue()


def custom_zip(rows: list[tuple], labels: list[int] | None, images: dict[str, bytes], extra=None) -> bytes:
    """A small official-layout ZIP with chosen rows, images and extra members."""
    x = pd.DataFrame(rows, columns=["designation", "description", "productid", "imageid"])
    extra = extra or {}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        if "X_train_update.csv" not in extra:
            zf.writestr("X_train_update.csv", x.to_csv())
        if labels is not None:
            zf.writestr("Y_train_CVw08PX.csv", pd.DataFrame({"prdtypecode": labels}).to_csv())
        for name, data in {**images, **extra}.items():
            zf.writestr(name, data)
    return buf.getvalue()


def zipfile_without(data: bytes, member: str) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            if info.filename != member:
                dst.writestr(info, src.read(info))
    return out.getvalue()


def all_keys(s3, settings) -> set[str]:
    return {f"{b}/{k}" for b in settings.buckets for k in list_keys(s3, b)}


def test_sample_ingests_with_the_right_counts(ray_cluster, s3, stack, lake_reset):
    data, catalogue = sample_bytes(300)
    result = ingest_job.run(upload(s3, stack, data, "first.zip"), stack)
    manifest = result.manifest
    assert not result.duplicate
    assert manifest.rows_read == manifest.accepted == manifest.new == len(catalogue) == 300
    assert manifest.with_image == 300 and manifest.rejected == 0
    assert len(manifest.class_counts) == 27
    products = lake.current_products(s3, stack)
    assert sorted(products["productid"]) == sorted(catalogue["productid"])
    merged = products.merge(catalogue, on="productid", suffixes=("", "_src"))
    assert (merged["prdtypecode"] == merged["prdtypecode_src"]).all()
    assert not merged["designation_clean"].str.contains("<|&eacute;", regex=True).any()
    # Images are stored once each, by content; the ZIP moved to the archive.
    assert len(list(list_keys(s3, stack.bucket_lake, layout.IMAGES))) == products["image_key"].nunique()
    assert exists(s3, stack.bucket_lake, layout.archive_key(manifest.batch_id))
    assert not list(list_keys(s3, stack.bucket_incoming))


def test_same_zip_again_under_another_name_changes_nothing(ray_cluster, s3, stack, lake_reset):
    data, _ = sample_bytes(60)
    first = ingest_job.run(upload(s3, stack, data, "a.zip"), stack)
    before = all_keys(s3, stack)
    again = ingest_job.run(upload(s3, stack, data, "renamed.zip"), stack)
    assert again.duplicate and again.manifest.batch_id == first.manifest.batch_id
    assert "nothing changed" in ingest_job.describe(again)
    assert all_keys(s3, stack) == before  # the renamed copy was archived onto the same key


def test_second_batch_updates_only_overlapping_products(ray_cluster, s3, stack, lake_reset):
    rows = [(f"Produit {i}", "", 100 + i, 1000 + i) for i in range(6)]
    images = {image_member_name(1000 + i, 100 + i): jpeg((i * 40, 0, 0)) for i in range(6)}
    first = ingest_zip(stack, s3, upload(s3, stack, custom_zip(rows, [10] * 6, images), "b1.zip")).manifest
    # Batch 2: products 104, 105 again (105 changed), and two new ones.
    rows2 = [("Produit 4", "", 104, 1004), ("Produit 5 modifié", "", 105, 1005),
             ("Produit 6", "", 106, 1006), ("Produit 7", "", 107, 1007)]  # fmt: skip
    images2 = {image_member_name(r[3], r[2]): jpeg((r[2] % 7 * 30, 0, 0)) for r in rows2}
    images2[image_member_name(1004, 104)] = images[image_member_name(1004, 104)]
    uri = upload(s3, stack, custom_zip(rows2, [10, 40, 50, 60], images2), "b2.zip")
    second = ingest_zip(stack, s3, uri).manifest
    assert (second.new, second.updated, second.unchanged) == (2, 1, 1)
    current = lake.current_products(s3, stack).set_index("productid")
    assert len(current) == 8
    assert (
        current.loc[105, "designation_clean"] == "Produit 5 modifié" and current.loc[105, "prdtypecode"] == 40
    )
    assert current.loc[101, "batch_id"] == first.batch_id
    assert current.loc[105, "batch_id"] == second.batch_id
    # The older version stays queryable by batch.
    old = lake.batch_products(s3, stack, first.batch_id).set_index("productid")
    assert old.loc[105, "designation_clean"] == "Produit 5"


@pytest.mark.parametrize("fail_at", ["images_stored", "products_written", "rejects_written"])
def test_a_crash_before_commit_leaves_no_batch_and_a_rerun_completes_it(
    ray_cluster, s3, stack, lake_reset, fail_at
):
    data, catalogue = sample_bytes(80, seed=3)
    uri = upload(s3, stack, data, "crash.zip")

    def crash(stage: str) -> None:
        if stage == fail_at:
            raise RuntimeError(f"injected failure at {stage}")

    with pytest.raises(RuntimeError, match="injected"):
        ingest_zip(stack, s3, uri, mapper=ingest_job.ray_data_mapper, on_stage=crash)
    assert lake.committed_manifests(s3, stack) == []
    assert lake.current_products(s3, stack).empty
    assert exists(s3, stack.bucket_incoming, "crash.zip")  # not archived before the commit
    result = ingest_job.run(uri, stack)
    assert not result.duplicate and result.manifest.accepted == 80
    products = lake.current_products(s3, stack)
    assert sorted(products["productid"]) == sorted(catalogue["productid"])
    assert products["productid"].is_unique


def test_row_and_image_problems_are_reported(s3, stack, lake_reset):
    bomb = io.BytesIO()
    Image.new("L", (6000, 4000)).save(bomb, "PNG")  # 24 Mpx, a few KB: over the 20 Mpx limit
    good = jpeg()
    truncated = good[: len(good) // 2]
    rows = [
        ("Bon produit", "<p>desc</p>", 1, 11),
        ("", "titre vide", 2, 12),
        ("Classe inconnue", "", 3, 13),
        ("Sans image", "", 4, 14),
        ("Image illisible", "", 5, 15),
        ("Image tronquée", "", 6, 16),
        ("Bombe", "", 7, 17),
        ("Doublon ancien", "", 8, 18),
        ("Doublon récent", "", 8, 18),
    ]
    images = {
        image_member_name(11, 1): good,
        image_member_name(15, 5): b"this is not an image",
        image_member_name(16, 6): truncated,
        image_member_name(17, 7): bomb.getvalue(),
        image_member_name(18, 8): good,
    }
    extra = {"../../escape/image_19_product_9.jpg": good, "/abs/image_20_product_10.jpg": good,
             "__MACOSX/._X_train_update.csv": b"junk"}  # fmt: skip
    uri = upload(s3, stack, custom_zip(rows, [10, 10, 999, 10, 10, 10, 10, 10, 40], images, extra), "bad.zip")
    manifest = ingest_zip(stack, s3, uri).manifest
    assert manifest.rejected_by_reason == {
        "empty_designation": 1,
        "unknown_label": 1,
        "duplicate_productid": 1,
    }
    assert manifest.kept_without_image_by_reason == {
        IMAGE_MISSING: 1, IMAGE_UNREADABLE: 2, IMAGE_TOO_LARGE: 1,
    }  # fmt: skip
    assert manifest.unsafe_members == 2
    products = lake.current_products(s3, stack).set_index("productid")
    assert sorted(products.index) == [1, 4, 5, 6, 7, 8]
    assert products.loc[1, "has_image"] and not products.loc[[4, 5, 6, 7], "has_image"].any()
    assert products.loc[8, "designation_clean"] == "Doublon récent"
    rejects = lake.get_rejects(s3, stack, manifest.batch_id)
    assert set(rejects["action"]) == {"rejected", "kept_without_image", "ignored_member"}
    # Zip-slip: nothing was written outside the lake's own prefixes, and nothing named after the member.
    keys = all_keys(s3, stack)
    assert not any("escape" in k or "abs" in k for k in keys)
    assert {k.split("/")[1] for k in keys if k.startswith(f"{stack.bucket_lake}/")} <= {
        "batches",
        "images",
        "archive",
    }


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"plain text, not a zip", "not a ZIP archive"),
        (None, "truncated"),
        ("nox", "missing X_train"),
        ("latin1", "not valid UTF-8"),
        ("nocolumn", "lacks column"),
        ("empty", "empty batch"),
    ],
)
def test_bad_zips_are_clear_errors_and_touch_nothing(s3, stack, lake_reset, data, message):
    good, _ = sample_bytes(30)
    ingest_zip(stack, s3, upload(s3, stack, good, "good.zip"))
    before = all_keys(s3, stack)
    if data is None:
        data = good[: len(good) // 2]
    elif data == "nox":
        data = zipfile_without(custom_zip([], [], {}, {"readme.txt": b"x"}), "X_train_update.csv")
    elif data == "latin1":
        data = custom_zip(
            [],
            None,
            {},
            {
                "X_train_update.csv": ",designation,description,productid,imageid\n0,Bébé,,1,2\n".encode(
                    "latin-1"
                )
            },
        )
    elif data == "nocolumn":
        data = custom_zip([], None, {}, {"X_train_update.csv": b",designation,productid,imageid\n0,a,1,2\n"})
    elif data == "empty":
        data = custom_zip([], [], {})
    with pytest.raises(IngestError, match=message):
        ingest_zip(stack, s3, upload(s3, stack, data, "bad.zip"))
    after = all_keys(s3, stack) - {f"{stack.bucket_incoming}/bad.zip"}
    assert after == before


def declare_size(data: bytes, member: str, size: int) -> bytes:
    """The ZIP with ``member``'s uncompressed size rewritten in its local and central headers (a liar)."""
    out, name = bytearray(data), member.encode()
    # (signature, offset of the size field, offset of the name length, offset of the name)
    for signature, size_at, name_len_at, name_at in (
        (b"PK\x03\x04", 22, 26, 30),
        (b"PK\x01\x02", 24, 28, 46),
    ):
        at = out.find(signature)
        while at >= 0:
            length = int.from_bytes(out[at + name_len_at : at + name_len_at + 2], "little")
            if bytes(out[at + name_at : at + name_at + length]) == name:
                out[at + size_at : at + size_at + 4] = size.to_bytes(4, "little")
            at = out.find(signature, at + 4)
    return bytes(out)


def test_fault_zip_bombs_and_lying_sizes_are_refused_without_inflating_them(s3, stack, lake_reset):
    """CSV members used to be inflated whole, and image members to their declared size, before any check."""
    settings = stack.model_copy(update={"max_csv_bytes": 1_000_000})
    rows = [("Produit", "desc", 1, 11), ("Autre", "desc", 2, 12)]
    bomb = ",designation,description,productid,imageid\n0,a," + "a" * 5_000_000 + ",1,11\n"
    bomb_zip = custom_zip([], None, {}, {"X_train_update.csv": bomb.encode()})  # 5 MB in ~10 kB
    cases = {
        "bomb.zip": (bomb_zip, "declares 5,000,053 bytes"),
        "lying-bomb.zip": (declare_size(bomb_zip, "X_train_update.csv", 900_000), "corrupt"),
        "liar.zip": (declare_size(custom_zip(rows, None, {}), "X_train_update.csv", 20), "corrupt"),
    }
    for name, (data, message) in cases.items():
        with pytest.raises(IngestError, match=message):
            ingest_zip(settings, s3, upload(s3, settings, data, name))
    assert not lake.committed_manifests(s3, settings)
    # An image member declaring 4 GB is not read: its product is kept without it, reason "too large".
    images = {image_member_name(11, 1): jpeg(), image_member_name(12, 2): jpeg()}
    data = declare_size(custom_zip(rows, None, images), image_member_name(12, 2), 4_000_000_000)
    manifest = ingest_zip(settings, s3, upload(s3, settings, data, "image-liar.zip")).manifest
    assert manifest.with_image == 1 and manifest.kept_without_image_by_reason == {IMAGE_TOO_LARGE: 1}


def test_unlabelled_batch_with_top_folder(ray_cluster, s3, stack, lake_reset):
    data, _catalogue = sample_bytes(40, with_labels=False, top_folder="rakuten_export")
    manifest = ingest_job.run(upload(s3, stack, data, "unlabelled.zip"), stack).manifest
    assert manifest.labelled is False and manifest.accepted == 40 and manifest.with_image == 40
    assert lake.current_products(s3, stack)["prdtypecode"].isna().all()


def test_an_unlabelled_resend_of_known_products_keeps_their_labels(ray_cluster, s3, stack, lake_reset):
    rows = [("chaise en bois", "pour le salon", 1, 11), ("lampe", "led", 2, 12)]
    ingest_zip(stack, s3, upload(s3, stack, custom_zip(rows, [1560, 2060], {}), "labelled.zip"))
    resent = [("chaise en chêne", "pour le salon", 1, 11), ("lampe", "led", 2, 12), ("tapis", "laine", 3, 13)]
    manifest = ingest_zip(stack, s3, upload(s3, stack, custom_zip(resent, None, {}), "x-only.zip")).manifest
    # Product 1 changed; product 2 is the same product (its label is not lost, so not "changed" either).
    assert manifest.labelled is False and (manifest.updated, manifest.unchanged, manifest.new) == (1, 1, 1)
    current = lake.current_products(s3, stack).set_index("productid")
    assert current.loc[1, "designation_clean"] == "chaise en chêne"
    assert current.loc[1, "prdtypecode"] == 1560 and current.loc[2, "prdtypecode"] == 2060
    assert pd.isna(current.loc[3, "prdtypecode"])


def test_cli_reports_a_missing_object(stack, capsys):
    assert ingest_job.main(["s3://incoming/does-not-exist.zip"]) == 2
    assert "does not exist" in capsys.readouterr().err
