"""The engines that carry a run between the sites and the coordinator: `inprocess` (every site on this machine),
`flower` (SuperLink and SuperNodes) and `nvflare` (an NVFlare job; optional extra), over the engine-neutral messages
(`medfdd.messages`), the site's turn (`medfdd.site.offer`) and the coordinator (`medfdd.coordinator.run`);
`consortium` reads the listed site configs once; `failures` fixes the only codes a failing site may send."""
