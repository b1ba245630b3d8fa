"""The engine: runs a loaded handle on prepared inputs and returns tensors. Nodes, the Train nodes, the command line
and the benchmarks all call these functions (see each module), so a node only parses its inputs and assembles a
plain CONDITIONING."""
