"""vllm-kvcdn: a prefill CDN for vLLM. Publish a document's KV once, load it everywhere.

Importing this package does not import vLLM or touch a device.
"""

__version__ = "0.1.0"
