//! Containers: cgroups, namespaces, root filesystems, hardening (being written).
