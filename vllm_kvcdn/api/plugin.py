"""``vllm.endpoint_plugins`` entry point: mounts ``/kvcdn/v1`` on vLLM's API server.

vLLM loads endpoint plugins only when named in ``VLLM_PLUGINS`` (``kvcdn serve`` does
that); plain ``vllm serve`` with our connector works without it, minus the side API.
"""

from __future__ import annotations

from vllm_kvcdn.log import get_logger

logger = get_logger(__name__)

PLUGIN_NAME = "kvcdn-api"


class KVCDNEndpointPlugin:
    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:
        from vllm_kvcdn.api.routes import router, store_errors_as_503

        app.include_router(router)
        store_errors_as_503(app)

    async def init_state(self, engine_client, state, args) -> None:
        from vllm_kvcdn.api.routes import KVCDNService
        from vllm_kvcdn.compat import vllm_fingerprint
        from vllm_kvcdn.config import KVCDNConfig
        from vllm_kvcdn.connector import CONNECTOR_NAME, CONNECTOR_NAMES

        if engine_client is None:
            return
        vllm_config = engine_client.vllm_config
        transfer = vllm_config.kv_transfer_config
        if transfer is None or transfer.kv_connector not in CONNECTOR_NAMES:
            logger.warning("kvcdn side API disabled: the server does not run %s", CONNECTOR_NAME)
            return
        config = KVCDNConfig.from_extra_config(transfer.kv_connector_extra_config)
        key = config.publish_key or None  # extra config, else $KVCDN_PUBLISHER_KEY
        state.kvcdn = KVCDNService(
            engine_client=engine_client,
            store=config.open_store(tiers=False),
            fingerprint=vllm_fingerprint(vllm_config),
            chunk_size=config.chunk_size,
            max_model_len=vllm_config.model_config.max_model_len,
            vocab_size=vllm_config.model_config.get_vocab_size(),
            publisher_key=key,
            ledger_path=config.ledger_path,
            tariff=config.prices,
            ratios=config.compute_ratios(),
            trust=config.trust_policy(),
            keys=config.keyring(),
        )
        logger.info(
            "kvcdn side API on /kvcdn/v1 (store %s, publishing %s, ledger %s)",
            config.store_url, "enabled" if key else "disabled: no publisher key", config.ledger_path or "off",
        )


def factory() -> KVCDNEndpointPlugin:
    return KVCDNEndpointPlugin()
