//! The image store: import, pull, layers, configs (being written).
