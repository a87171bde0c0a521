"""SmolLM2-135M perplexity on WikiText-2: the method table (`table`), the default's ablation (`ablation`) and its
quick proxy (`proxy`), static 8-bit activations (`attention_sink`), mixed precision (`mixed_precision`), and how far
the GGUF weights are from each 4-bit grid (`gguf_grid`)."""
