"""CPU expert kernels: the native kernel (vector and AMX tile paths, its pool), its build, CPU threads."""
