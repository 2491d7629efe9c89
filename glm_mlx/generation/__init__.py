"""One sequence: the engine (prefill, decode, MTP speculative decoding), sampling, constrained decoding,
prompt caches, text streaming and chat sessions."""
