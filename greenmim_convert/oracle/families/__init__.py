"""One module per family of modules the oracle knows; each is imported only for a model that holds one
(see ``FAMILY_MODULES`` in ``greenmim_convert.oracle.hooks``)."""
