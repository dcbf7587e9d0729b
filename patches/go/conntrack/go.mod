// Standalone build of the stdlib-only files patches/ adds to upstream
// k8s.io/kubernetes/pkg/proxy/conntrack, so CI can compile and test them
// without a kubernetes checkout. Files here are byte-identical to the files
// the series creates (patches/tests checks this).
module refproxy.local/patches/conntrack

go 1.22
