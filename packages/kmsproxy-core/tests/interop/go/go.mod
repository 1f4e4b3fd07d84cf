module kmsproxy.test/tlspeer

go 1.27
