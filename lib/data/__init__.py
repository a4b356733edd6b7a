"""The data contract and the lake: the Rakuten format, the sample generator, ZIP ingestion, storage."""
