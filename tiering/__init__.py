"""Cloud tiering: copy a repository's sealed packs and points to S3 or Azure Blob (sync.py), and rebuild
a repository from a bucket after losing the site (attach.py). See docs/tiering.md."""
