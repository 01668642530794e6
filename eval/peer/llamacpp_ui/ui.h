// The interface llama-server's HTTP layer expects of its embedded web UI: a list of assets (none here).
#pragma once

#include <cstddef>
#include <string>
#include <vector>

struct llama_ui_asset {
    std::string name;                 // path below the server's root
    std::string type;                 // MIME type
    std::string etag;
    const unsigned char * data = nullptr;
    size_t size = 0;
};

const std::vector<llama_ui_asset> & llama_ui_get_assets();
const llama_ui_asset * llama_ui_find_asset(const std::string & name);
bool llama_ui_use_gzip();
