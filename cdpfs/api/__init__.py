"""The node API: health, metrics, JSON documents, events and actions over HTTP."""
