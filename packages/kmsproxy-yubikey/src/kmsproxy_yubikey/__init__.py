"""kmsproxy backend for YubiKey PIV slots through Yubico's ykcs11 module."""
