"""The ``kvcdn`` command: ``main`` (the commands), ``market`` (usage and economics),
``serve`` (vLLM's server with the connector and the side API), ``demo``."""
