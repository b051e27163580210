"""Device certificates: the fleet's device CA, CSR checks, signing and revocation (CRL)."""
