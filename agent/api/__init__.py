"""The local inference API for applications on the device."""
