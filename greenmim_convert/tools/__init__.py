"""Tools around the compiler: the command line, benchmarks, FLOP counts, the coverage matrix, model builders."""
