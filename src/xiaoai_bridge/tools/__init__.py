"""Tools the model may call: Home Assistant, XiaoAi's own skills, MCP servers, built-ins."""
