"""vLLM plugin entry point: registers ``KVCDNConnector`` by module path (lazy import),
under its class name and the short name ``kvcdn``."""

from __future__ import annotations


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from vllm_kvcdn.connector import CONNECTOR_MODULE, CONNECTOR_NAME, CONNECTOR_NAMES

    # Runs in every vLLM process; the factory raises on a duplicate name.
    for name in CONNECTOR_NAMES:
        if name not in KVConnectorFactory._registry:
            KVConnectorFactory.register_connector(name, CONNECTOR_MODULE, CONNECTOR_NAME)
