"""Data: real datasets read offline, webdataset shards, and the training pipeline. The only webdataset importer."""
