"""The device's client certificate for the broker (mutual TLS): key and CSR made here."""
