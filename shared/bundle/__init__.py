"""The signed bundle: manifest, DSSE envelope, trust root, single-file archive."""
