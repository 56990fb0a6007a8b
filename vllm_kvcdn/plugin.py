"""vLLM plugin entry point: registers ``KVCDNConnector`` by module path (lazy import)."""

from __future__ import annotations


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from vllm_kvcdn.connector import CONNECTOR_MODULE, CONNECTOR_NAME

    # Runs in every vLLM process; the factory raises on a duplicate name.
    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, "KVCDNConnector")
