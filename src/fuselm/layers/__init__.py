"""Model building blocks: tensor-parallel linears, embeddings, norm, rotary, attention, sampler."""
