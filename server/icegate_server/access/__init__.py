"""Who is calling: caller keys, client certificates, the per-call guard, rate limits."""
