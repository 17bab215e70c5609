"""megafusion's examples: configs (``examples/configs``) and experiments (:mod:`examples.experiments`)."""
