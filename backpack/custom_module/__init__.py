"""Modules that make graphs expressible as modules with rules (see ``extend``)."""
