"""Evaluation of a model + Layer Routers on the synthetic long-context suite or a jsonl of
``{context, question, answer, task}``: accuracy, held-out perplexity, SA fraction per task and layer,
prefill and decode time, for all-FA, Flux and all-SA. ``python -m flux_attention.eval --help``;
``make demo`` trains a router on SmolLM2-135M and runs it (docs/demo.md)."""
