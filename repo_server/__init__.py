"""The Chunkyard repository server: storage engine (engine/) and HTTP API (api/)."""
