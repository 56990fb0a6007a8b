"""Rigs for the tests, benchmarks and the demo: a tiny generated Qwen3 model
(``tiny_model``), offline engines (``offline``, ``engine_job``), a server process
(``server_process``) and the exactness measures (``exactness``). Not used when serving."""
