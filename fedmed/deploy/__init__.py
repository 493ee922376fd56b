"""Provisioning (CA, certificates, node keys) and supervision of Flower's SuperLink and SuperNodes."""
