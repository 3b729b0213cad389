"""Evidence: numerical parity with Polygraphy, the margin certificate, the benchmark protocol."""
