"""Process groups, collectives and the custom all-reduce: what tensor-parallel layers import."""
