"""A card's data: reading (`read`), labels (`labels`), words and sub-words (`words`),
tokenization (`tokenize`) and DataLoaders (`loaders`). Import the submodules: `mtnlp.data.words`
never loads `datasets`."""
