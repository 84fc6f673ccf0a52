"""Development tooling, not used by the operator or the workers: the local dev stack
(``embedjob dev ...``), a real etcd + kube-apiserver, and Redis / SeaweedFS S3 on free ports for the
stack and the tests."""
