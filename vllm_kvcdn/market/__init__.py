"""Cache reads as a product: the ledger that meters them (``ledger``), the prices and the
paper's cost model (``economics``), and the usage report that combines both (``usage``)."""
