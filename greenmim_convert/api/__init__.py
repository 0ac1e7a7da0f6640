"""The public API: ``convert`` and ``GreenModel``, masks, saving and loading."""
