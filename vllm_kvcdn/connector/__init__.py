"""The vLLM KV connector (imports vLLM; the rest of the package does not need it)."""

CONNECTOR_NAME = "KVCDNConnector"
# What `--kv-transfer-config '{"kv_connector": ...}'` may name: the short name and the class's.
CONNECTOR_NAMES = ("kvcdn", CONNECTOR_NAME)
CONNECTOR_MODULE = "vllm_kvcdn.connector.connector"
