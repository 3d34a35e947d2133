"""The torch and tokenizer parts the workers are built from: loading and merging models, fine-tuning
methods, distributed engines, packing, chat encoding, scoring, training outputs."""
