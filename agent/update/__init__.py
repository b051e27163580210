"""The update lifecycle: state machine, persisted records, blobs, downloads, installer."""
