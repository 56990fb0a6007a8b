"""The vLLM KV connector (imports vLLM; the rest of the package does not need it)."""

CONNECTOR_NAME = "KVCDNConnector"
CONNECTOR_MODULE = "vllm_kvcdn.connector.connector"
