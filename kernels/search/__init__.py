"""The kernel search (after KernelEvolve): candidates, gate, fitness, selection, graph on disk."""
