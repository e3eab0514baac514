"""Pure KGMEL logic: schemas, readers, encoders, the retriever, training, FAISS, LLM stages, metrics.

Nothing here knows about Prefect or the artifact folder layout. Importing the package sets the offline
environment defaults (`kgmel_core.environment`) before any library that reads them is imported.
"""

from kgmel_core.environment import use_offline_defaults

use_offline_defaults()
