"""The ``nin`` command line (:mod:`nin.cli.main`)."""
