//go:build linux
// +build linux

/*
Copyright 2026 The Kubernetes Authors.

Licensed under the Apache License, Version 2.0 (the "License");
you may not use this file except in compliance with the License.
You may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software
distributed under the License is distributed on an "AS IS" BASIS,
WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
See the License for the specific language governing permissions and
limitations under the License.
*/

package conntrack

// This file takes UDP conntrack cleanup off the syncProxyRules path
// (kubernetes/kubernetes#135323): the sync hands over a CleanupRequest and
// returns; one goroutine per IP family runs the cleaner on the newest request.

import (
	"sync"
	"time"
)

// pendingRetryInterval is how soon a run that left entries over budget (or
// hit an error) is repeated without waiting for the next sync.
const pendingRetryInterval = time.Second

// asyncCleaner runs a cleaner on its own goroutine. Guarantees:
//  1. Submit never blocks and never waits for a cleanup to finish.
//  2. Requests submitted while a run is in progress are coalesced: the next
//     run uses the newest one (older ones are superseded, never lost work,
//     because each request is the full desired state).
//  3. A run that leaves entries pending is repeated after pendingRetryInterval
//     even if no new request arrives.
type asyncCleaner struct {
	mu       sync.Mutex
	latest   *CleanupRequest
	wake     chan struct{}
	c        *cleaner
	onReport func(CleanupRequest, CleanupReport)
	after    func(time.Duration) <-chan time.Time
}

func newAsyncCleaner(c *cleaner, onReport func(CleanupRequest, CleanupReport)) *asyncCleaner {
	return &asyncCleaner{c: c, wake: make(chan struct{}, 1), onReport: onReport, after: time.After}
}

// Submit records req as the newest desired state and wakes the runner.
func (a *asyncCleaner) Submit(req CleanupRequest) {
	a.mu.Lock()
	a.latest = &req
	a.mu.Unlock()
	select {
	case a.wake <- struct{}{}:
	default:
	}
}

func (a *asyncCleaner) runOnce() (CleanupReport, bool) {
	a.mu.Lock()
	req := a.latest
	a.mu.Unlock()
	if req == nil {
		return CleanupReport{}, false
	}
	rep := a.c.run(*req)
	if a.onReport != nil {
		a.onReport(*req, rep)
	}
	return rep, true
}

// Run serves requests until stop is closed.
func (a *asyncCleaner) Run(stop <-chan struct{}) {
	var retry <-chan time.Time
	for {
		select {
		case <-stop:
			return
		case <-a.wake:
		case <-retry:
		}
		retry = nil
		if rep, ok := a.runOnce(); ok && (rep.Pending > 0 || rep.Errors > 0) {
			retry = a.after(pendingRetryInterval)
		}
	}
}

var cleaners = map[uint8]*asyncCleaner{}

// submitKernelCleanup hands req to the family's background cleaner, starting
// it on first use. It returns immediately.
func submitKernelCleanup(req CleanupRequest, onReport func(CleanupRequest, CleanupReport)) {
	policyMu.Lock()
	a, ok := cleaners[req.Family]
	if !ok {
		a = newAsyncCleaner(newCleaner(kernelTable{}, cleanupPolicy), onReport)
		cleaners[req.Family] = a
		go a.Run(make(chan struct{}))
	}
	policyMu.Unlock()
	a.Submit(req)
}
