"""Analysis of models and runs without training them: `flops` (parameter and FLOP counts),
`memory_plan` (per-device memory on a mesh, from shapes), `aot` (the train step compiled for a TPU
slice on any host), and the benchmarks behind `mosaics-bench`: `timing` (medians, planned peak
memory, the matmul yardstick), `bench_kernels`, `bench_train` and `profile`.
"""
