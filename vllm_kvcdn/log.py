"""Loggers under ``vllm.kvcdn``: inside vLLM they share its handlers and format."""

import logging


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"vllm.kvcdn.{name.rsplit('.', 1)[-1]}")
