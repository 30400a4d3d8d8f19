/* For benchmarks only (bench/compare.sh, REF_MKL=features): LD_PRELOADed into the PyTorch
 * reference so that the MKL inside its libtorch_cpu picks its kernels by the CPU's features, as
 * it does on an Intel CPU, instead of taking its AVX2 path on every non-Intel one. This is the
 * answer the ibot executable gives MKL itself (csrc/fastops.cpp), so both sides then run the
 * same MKL kernels: the comparison to expect on an Intel CPU, where MKL is not handicapped. */
int mkl_serv_intel_cpu_true(void) { return 1; }
